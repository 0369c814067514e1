"""samadapt: adapt Segment Anything family models to medical image segmentation."""

__version__ = "0.1.0"
