"""Z-Mask calibration: clean-data channel statistics, fusion-block training and the lambda0 threshold."""
