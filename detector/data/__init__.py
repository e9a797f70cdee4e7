"""COCO-format data: the scanned dataset (coco.py; its checks coco_scan.py, its json reading coco_json.py, its
cache scan_cache.py), augmentation pipelines (transforms.py), loaders (loader.py), the synthetic datasets
(synthetic.py: the bundled shapes; synthetic_hard.py, synthetic_photo.py: the hard benchmarks; synthetic_common.py:
what they share), `detector data check` (check.py) and the user's cache folder (user_cache.py)."""
