"""The options of every command but `train` (whose keys are `detector.config.TrainConfig`).

Each class is what `detector <command> --help` lists and what the Python API accepts as keyword arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

from detector.config import option, worker_priority_option, workers_option


@dataclass
class ValOptions:
    weights: str = option("", "checkpoint to evaluate (weights/best.pt), or its export: .onnx, OpenVINO .xml or folder")
    data: str = option("", "dataset YAML (default: the one the checkpoint was trained on)")
    split: str = option("val", "val or train", choices=["val", "train"])
    imgsz: int = option(0, "image size (0: the checkpoint's training size)", ge=0, le=8192, multiple_of=32)
    batch: int = option(16, "batch size", ge=1, le=4096)
    conf: float = option(0.001, "confidence threshold", ge=0, le=1)
    iou: float = option(0.6, "NMS IoU threshold (0.65 for reported COCO figures)", ge=0, le=1)
    max_det: int = option(300, "detections kept per image", ge=1, le=100_000)
    augment: bool = option(False, "test-time augmentation: scales 1, 0.83, 0.67 (one flipped left-right), merged by NMS")
    rect: bool = option(True, "rectangular batches (images sorted by aspect ratio)")
    workers: int | str = workers_option("data-loading workers (auto: as in detector train)")
    worker_priority: str = worker_priority_option()
    device: str = option("", "'' (auto), cpu, cuda, 0 ...")
    half: bool = option(True, "half precision on GPU (ignored on CPU)")
    backend: str = option("auto", "COCO metric: auto (faster when installed), pycocotools or faster (faster-coco-eval, same numbers)", choices=["auto", "pycocotools", "faster"])
    save_json: bool = option(True, "write predictions.json")
    plots: bool = option(True, "PR curves, confusion matrix, example images")
    project: str = option("runs/val", "parent folder of the output folder")
    name: str = option("exp", "output folder name (auto-incremented unless exist_ok)")
    exist_ok: bool = option(False, "reuse an existing output folder")


@dataclass
class InfoOptions:
    model: str = option("configs/models/yolo-ca-n.yaml", "model YAML (path or name in configs/models)")
    weights: str = option("", "a checkpoint instead of a YAML")
    imgsz: int = option(640, "image size for the GFLOPs count", ge=32, le=8192, multiple_of=32)
    nc: int = option(0, "number of classes (0: the YAML's)", ge=0, le=100_000)
    attention: str = option("", "override the YAML's attention")
    attention_at: str = option("", "override the attention place: output, concat, bottleneck", choices=["", "output", "concat", "bottleneck"])
    source: str = option("", "an image for attention_maps")
    attention_maps: bool = option(False, "save PNGs of every attention layer's weights over `source`")
    project: str = option("runs/info", "parent folder for attention maps")
    name: str = option("exp", "output folder name")
    exist_ok: bool = option(False, "reuse an existing output folder")


@dataclass
class EnvOptions:
    format: str = option("text", "text (one screen, for people) or json (the same facts, for tools)", choices=["text", "json"])


@dataclass
class SynthOptions:
    profile: str = option(
        "easy",
        "easy (the bundled shapes), hard (the benchmark set: shapes on photos, clutter, tiny objects) or photo "
        "(a second hard set: textured objects cut from photographs)",
        choices=["easy", "hard", "photo"],
    )
    out: str = option("", "output folder ('': data/shapes, data/shapes-hard or data/photo-objects, by profile)")
    seed: int = option(0, "generator seed (same seed, same bytes)", ge=0, le=2**32 - 1)
    n_train: int = option(0, "training images (0: the profile's default, easy 2000, hard and photo 600)", ge=0, le=1_000_000)
    n_val: int = option(0, "validation images (0: the profile's default, easy 300, hard and photo 150)", ge=0, le=1_000_000)
    imgsz: int = option(320, "long side of the generated images (easy only; hard and photo draw 192-512 px per side)", ge=32, le=4096)


@dataclass
class CheckOptions:
    data: str = option("data/shapes.yaml", "dataset YAML")
    strict: bool = option(False, "fail when anything is skipped")
    imgsz: int = option(320, "image size of the augmented preview batches", ge=32, le=8192, multiple_of=32)
    save_dir: str = option("runs/data/check", "where the statistics and preview PNGs go")


@dataclass
class ConvertOptions:
    data: str = option("", "the Ultralytics data.yaml to convert (path, train, val, names; labels/*.txt beside the images)")
    out: str = option("", "folder for instances_train.json, instances_val.json and <data stem>-coco.yaml ('': beside data)")


@dataclass
class PredictOptions:
    weights: str = option("", "checkpoint (weights/best.pt), or its export: .onnx, OpenVINO .xml or folder")
    source: str = option("", "an image, a folder, a glob, a video (mp4 avi mov mkv webm m4v mpeg mpg) or a camera index (0)")
    imgsz: int = option(0, "image size (0: the checkpoint's training size)", ge=0, le=8192, multiple_of=32)
    batch: int = option(8, "images (or video frames) per forward pass", ge=1, le=4096)
    vid_stride: int = option(1, "video: predict every N-th frame (the saved video keeps those, at fps / N)", ge=1, le=10_000)
    conf: float = option(0.25, "confidence threshold", ge=0, le=1)
    iou: float = option(0.45, "NMS IoU threshold", ge=0, le=1)
    max_det: int = option(300, "detections kept per image", ge=1, le=100_000)
    augment: bool = option(False, "test-time augmentation: scales 1, 0.83, 0.67 (one flipped left-right), merged by NMS")
    classes: list[int] = option([], "keep only these class indices (comma list)", ge=0, le=100_000)
    agnostic_nms: bool = option(False, "NMS across classes: of two overlapping boxes of different classes only the better stays")
    track: bool = option(False, "video or camera: follow each object across frames (ByteTrack) and give it a track id")
    track_low: float = option(0.1, "track=true: boxes scored from track_low up to conf keep a track but start none", ge=0, le=1)
    track_buffer: int = option(30, "track=true: predicted frames a lost track waits to be found again", ge=1, le=100_000)
    device: str = option("", "'' (auto), cpu, cuda, 0 ...")
    save_images: bool = option(True, "save images (or the video) with the boxes drawn")
    save_txt: bool = option(False, "images: also labels/<image>.txt in YOLO format (class cx cy w h, normalised), e.g. to review or train on")
    save_conf: bool = option(False, "save_txt: end each label row with its score")
    save_crop: bool = option(False, "images: also crops/<class>/<image>_<k> of each box's pixels (the k-th box by score)")
    project: str = option("runs/predict", "parent folder of the output folder")
    name: str = option("exp", "output folder name (auto-incremented unless exist_ok)")
    exist_ok: bool = option(False, "reuse an existing output folder")


@dataclass
class ExportOptions:
    weights: str = option("", "checkpoint to export")
    format: str = option("onnx", "onnx (checked with onnxruntime) or openvino (IR, checked with OpenVINO's CPU runtime)", choices=["onnx", "openvino"])
    imgsz: int = option(0, "input size (0: the checkpoint's training size)", ge=0, le=8192, multiple_of=32)
    batch: int = option(1, "batch size of the sample input", ge=1, le=4096)
    dynamic: bool = option(False, "dynamic height and width too (the batch axis is always dynamic)")
    nms: bool = option(False, "include NMS in the graph")
    conf: float = option(0.25, "confidence threshold of the in-graph NMS", ge=0, le=1)
    iou: float = option(0.45, "IoU threshold of the in-graph NMS", ge=0, le=1)
    max_det: int = option(300, "detections per image of the in-graph NMS", ge=1, le=100_000)
    opset: int = option(18, "ONNX opset", ge=14, le=23)
    simplify: bool = option(False, "simplify the graph with onnxslim (the export extra)")
    half: bool = option(False, "fp16 weights (format=openvino only: half the .bin, checked to 1e-2 relative)")
    int8: bool = option(False, "INT8 post-training quantization (format=onnx): convolutions in 8 bits, calibrated on `data`'s train images")
    data: str = option("", "dataset YAML whose train images feed the check and calibrate int8 (default: the one the checkpoint was trained on)")
    calib_images: int = option(64, "int8: calibration images, evenly spaced over the train split", ge=1, le=100_000)
    out: str = option("", "output path (default: beside the weights, <stem>.onnx, <stem>_int8.onnx; openvino: the folder <stem>_openvino_model, or out=<name>.xml)")


@dataclass
class AblateOptions:
    model: str = option("configs/models/yolo-attn-n.yaml", "model YAML with Attn/AttnC2f rows")
    data: str = option("data/shapes.yaml", "dataset YAML")
    attentions: list[str] = option(["none", "ca", "se", "cbam", "eca", "mhsa", "axial", "ssa", "gate", "edge", "coord", "gc"],
                                   "attention variants and spatial priors (comma list)")
    attention_at: list[str] = option([], "insertion points to cross with the attentions: output,concat,bottleneck", choices=["output", "concat", "bottleneck"])
    epochs: int = option(30, "epochs per run", ge=1, le=100_000)
    imgsz: int = option(320, "image size", ge=32, le=8192, multiple_of=32)
    batch: int = option(16, "batch size", ge=1, le=4096)
    workers: int | str = workers_option("data-loading workers (auto: as in detector train)")
    seed: int = option(0, "seed shared by every run (same init, same data order)", ge=0, le=2**32 - 1)
    seeds: list[int] = option([], "train every variant under each seed (comma list, e.g. 0,1,2; overrides seed): mean ± std and paired AP differences", ge=0, le=2**32 - 1)
    device: str = option("", "'' (auto), cpu, cuda, 0 ...")
    project: str = option("runs/ablate", "parent folder")
    name: str = option("exp", "ablation folder name (re-running the same name resumes it)")
    train: list[str] = option([], "extra train key=value pairs, as k1=v1,k2=v2 (e.g. lr0=0.002)")


@dataclass
class TuneOptions:
    model: str = option("configs/models/yolo-ca-n.yaml", "model YAML (path, or a name in configs/models)")
    data: str = option("data/shapes.yaml", "dataset YAML")
    iterations: int = option(30, "trials: the first trains the starting hyperparameters, each later one a mutation of the best so far", ge=1, le=10_000)
    epochs: int = option(10, "epochs per trial", ge=1, le=100_000)
    imgsz: int = option(640, "image size", ge=32, le=8192, multiple_of=32)
    batch: int = option(16, "batch size", ge=1, le=4096)
    workers: int | str = workers_option("data-loading workers (auto: as in detector train)")
    seed: int = option(0, "training seed of every trial, and the seed of the mutations", ge=0, le=2**32 - 1)
    device: str = option("", "'' (auto), cpu, cuda, 0 ...")
    space: str = option("", "YAML of train key: [low, high] or [low, high, log] to search ('': configs/tune/space.yaml)")
    sigma: float = option(0.2, "mutation step: the standard deviation of a key's change, as a fraction of its range", gt=0, le=1)
    project: str = option("runs/tune", "parent folder")
    name: str = option("exp", "tune folder name (re-running the same name resumes it)")
    train: list[str] = option([], "extra train key=value pairs fixed in every trial, as k1=v1,k2=v2 (e.g. optimizer=SGD)")


# `detector bench <name>`: the keys of each benchmark in detector/tools/bench/ (here, not beside the code, so that the CLI
# lists and checks them without importing torch).


@dataclass
class BenchModelsOptions:
    configs: list[str] = option([], "model configs, names or paths (comma list; empty: every YAML in configs/models)")
    imgsz: int = option(320, "input size of the random images and the GFLOPs count", ge=32, le=8192, multiple_of=32)
    batch: int = option(8, "batch size of the batched eval forward and the train step", ge=1, le=4096)
    iters: int = option(5, "timed iterations per rate (the fastest one counts)", ge=1, le=100_000)
    warmup: int = option(2, "untimed iterations before the timed ones", ge=0, le=100_000)
    modes: list[str] = option(["fp32", "fp32-cl", "bf16-cl"],
                              "comma list of fp32 (NCHW), fp32-cl (channels_last), bf16-cl (bf16 autocast + channels_last)",
                              choices=["fp32", "fp32-cl", "bf16-cl"])
    device: str = option("cpu", "device to time on: cpu, cuda, cuda:0 ...")
    threads: int = option(0, "CPU intra-op threads (0: torch's default)", ge=0, le=1024)


@dataclass
class BenchDataOptions:
    data: str = option("", "dataset YAML ('': 192 synthetic images drawn at each imgsz, in a temporary folder)")
    imgsz: list[int] = option([320, 640], "image sizes (comma list)", ge=32, le=8192, multiple_of=32)
    workers: list[int] = option([0, 1, 2], "data-loading worker counts (comma list)", ge=0, le=64)
    batch: int = option(16, "batch size", ge=1, le=4096)
    batches: int = option(8, "batches timed per row, after one warm-up batch", ge=1, le=100_000)
    cache: str = option("", "'ram' keeps decoded images in memory, 'auto' when they fit a quarter of the available memory", choices=["auto", "ram", ""])
    scale: str = option("", "'coco': scan and loader at COCO scale instead (118,287 hard-linked images: scan times, "
                        "RSS, worker USS, time to the first batch at the largest imgsz and workers)", choices=["", "coco"])
    steps: int = option(300, "scale=coco: batches between the two readings of each worker's USS", ge=1, le=100_000)


@dataclass
class BenchTrainOptions:
    configs: list[str] = option(["yolo-ca-n", "yolo-c2f-n", "yolov5n"], "model configs, names or paths (comma list)")
    imgsz: int = option(320, "training image size", ge=32, le=8192, multiple_of=32)
    batch: int = option(16, "batch size", ge=1, le=4096)
    workers: int | str = workers_option("data-loading workers of the end-to-end run (auto: as in detector train)")
    worker_priority: str = worker_priority_option()
    images: int = option(320, "training images per epoch (a generated shapes set; unused with data=)", ge=1, le=1_000_000)
    data: str = option("", "dataset YAML to time a real epoch on ('': the generated shapes set)")
    amp: str = option("auto", "autocast: auto, bf16, fp16, off (as in detector train)", choices=["auto", "bf16", "fp16", "off"])
    channels_last: bool = option(True, "channels_last memory format")
    profile: bool = option(False, "also split the end-to-end run's main process into its stages (torch.profiler)")
    cache: str = option("auto", "the end-to-end run's decoded-image cache: ram, auto or '' (off), as in detector train", choices=["auto", "ram", ""])
    device: str = option("", "'' (a GPU when there is one, else the CPU), cpu, cuda, 0 ... (one device)")
    compile: bool = option(False, "torch.compile the model in all three runs, as detector train compile=true (its compilation is not timed)")


@dataclass
class BenchValOptions:
    models: list[str] = option(["yolo-c2f-n", "yolo-ca-n", "yolov5n"], "model configs, names or paths (comma list; untrained)")
    weights: str = option("", "a checkpoint instead of the models")
    data: str = option("", "dataset YAML ('': a synthetic shapes val set of `images` images, in a temporary folder)")
    imgsz: list[int] = option([320, 640], "image sizes (comma list)", ge=32, le=8192, multiple_of=32)
    batch: int = option(16, "batch size", ge=1, le=4096)
    images: int = option(64, "images of the synthetic val set (unused with data=)", ge=1, le=1_000_000)
    workers: int = option(0, "data-loading workers", ge=0, le=64)
    device: str = option("", "'' (auto), cpu, cuda, 0 ...")
    metric_images: int = option(5000, "images of the synthetic COCO metric case (0: skip it)", ge=0, le=100_000)
    dets_per_image: int = option(100, "detections per image in the metric case", ge=1, le=10_000)
    classes: int = option(80, "classes in the metric case", ge=1, le=10_000)


@dataclass
class BenchAmpOptions:
    config: str = option("yolo-ca-n", "model config, name or path")
    images: int = option(500, "training images (a generated shapes set)", ge=1, le=1_000_000)
    val_images: int = option(100, "validation images", ge=1, le=1_000_000)
    imgsz: int = option(192, "image size", ge=32, le=8192, multiple_of=32)
    epochs: int = option(12, "epochs per run", ge=1, le=100_000)
    batch: int = option(16, "batch size", ge=1, le=4096)
    workers: int | str = workers_option("data-loading workers (auto: as in detector train)")
    seed: int = option(0, "seed of the fp32 and bf16 runs (and of the generated set)", ge=0, le=2**32 - 2)
    noise_seed: int | None = option(None, "seed of the second fp32 run, the noise (None: seed + 1; -1 skips that run)", ge=-1, le=2**32 - 1)
    channels_last: bool = option(True, "channels_last memory format")
    device: str = option("", "'' (a GPU when there is one, else the CPU), cpu, cuda, 0 ...")


@dataclass
class BenchTrackOptions:
    sequences: int = option(5, "simulated sequences per row (the table shows their mean and spread)", ge=1, le=100)
    frames: int = option(300, "frames per sequence", ge=2, le=10_000)
    objects: int = option(20, "objects per sequence (moving at constant speed, bouncing off the frame's edges)", ge=1, le=500)
    miss: float = option(0.05, "share of object boxes the simulated detector misses", ge=0, le=1)
    dim: float = option(0.2, "share of object boxes scored between track_low and conf (occluded, blurred)", ge=0, le=1)
    false_positives: float = option(1.0, "false boxes per frame (Poisson mean), scored 0.1-0.4", ge=0, le=100)
    jitter: float = option(0.05, "box noise: standard deviation of each side, as a share of the box size", ge=0, le=1)
    conf: float = option(0.25, "the tracker's conf (high boxes)", ge=0, le=1)
    track_low: float = option(0.1, "ByteTrack's low boxes from here (its row; the other row keeps boxes from conf only)", ge=0, le=1)
    track_buffer: int = option(30, "frames a lost track waits", ge=1, le=100_000)
    min_iou: float = option(0.5, "IoU at which a tracker box counts as its truth box (MOTA, IDF1)", ge=0.01, le=1)
    seed: int = option(0, "seed of the first sequence", ge=0, le=2**32 - 101)


@dataclass
class BenchExportOptions:
    model: str = option("yolo-ca-n", "model config (name or path; untrained weights) or a checkpoint")
    imgsz: list[int] = option([320, 640], "input sizes (comma list)", ge=32, le=8192, multiple_of=32)
    runtimes: list[str] = option(["pytorch", "onnxruntime", "onnxruntime-int8", "openvino", "openvino-bf16", "opencv"],
                                 "comma list: pytorch (BN-folded copy, channels_last), onnxruntime, onnxruntime-int8 "
                                 "(detector export int8=true; needs data= or a trained checkpoint), openvino (f32), "
                                 "openvino-bf16 (CPUs with bf16 units only), opencv (cv2.dnn)",
                                 choices=["pytorch", "onnxruntime", "onnxruntime-int8", "openvino", "openvino-bf16", "opencv"])
    data: str = option("", "dataset YAML whose train images check every export and calibrate onnxruntime-int8 (default: the checkpoint's training data)")
    batch: int = option(1, "images per run (1: latency; more: throughput of batched serving)", ge=1, le=256)
    iters: int = option(30, "timed runs per row (the median counts)", ge=1, le=100_000)
    warmup: int = option(5, "untimed runs before the timed ones", ge=0, le=100_000)
    threads: int = option(0, "CPU threads of every runtime (0: torch's default)", ge=0, le=1024)
