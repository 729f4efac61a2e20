"""VOC2007 classification transfer (Table 2, 'Classification' column): `train.main`."""
