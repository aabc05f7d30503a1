"""Object detection track: torchvision detectors on CamVid boxes, their Z-Mask layer sets, training, mAP."""
