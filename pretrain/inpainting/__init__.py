"""Semantic inpainting (Section 5.1): the 128-px context encoder, Table 1 and its figures.

model (generator), data (crops), config, train (`bench pretrain --method inpainting`),
weights (generator file), evaluate (`bench inpaint evaluate`: Table 1), nearest (the
nearest-neighbour baselines), figures (`bench inpaint figures`: Figures 6 and 8).
"""
