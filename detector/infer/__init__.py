"""Inference: evaluation and the COCO metric, NMS, prediction on files, export, attention maps."""
