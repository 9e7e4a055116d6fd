"""Export of the NSDD student plus the FFT pseudo-inverse as one ONNX graph, quantisation and TensorRT."""
