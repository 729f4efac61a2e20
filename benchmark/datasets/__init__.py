"""Dataset readers in their own formats: VOC XML/splits/masks, SBD .mat, image folders.

`voc` parses PASCAL VOC, `folder` lists unlabelled image folders, `synth` writes the
embedded synthetic VOCdevkit, `check` validates a dataset, `resolve` picks the default.
"""
