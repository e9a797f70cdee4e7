"""COCO-format data: the scanned dataset (coco.py), augmentation pipelines (transforms.py), loaders (loader.py),
the bundled synthetic shapes dataset (synthetic.py) and `detector data check` (check.py)."""
