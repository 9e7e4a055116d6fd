"""nsdd-edge device runtime: shared optics, model bundles and the real-time lensless camera loop.

Needs only numpy and OpenCV (plus TensorRT/ONNX Runtime/camera libraries where present); never torch.
"""

__version__ = "0.1.0"
