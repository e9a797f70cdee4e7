#!/usr/bin/env python3
"""`python scripts/rivals.py data=<dataset yaml> epochs=60 imgsz=256 batch=16 seed=0 rivals=yolov8n,yolo26n,ours`

Ours against Ultralytics YOLOv8n / YOLO26n, trained alike and scored by our pycocotools path; `--help` lists the
keys. The logic is `detector.tools.bench.rivals`; Ultralytics runs only in its own venv, through scripts/rivals_driver.py.
"""

import sys

from detector.tools.bench.rivals import cli

if __name__ == "__main__":
    sys.exit(cli())
