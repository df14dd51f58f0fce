"""ONNX Runtime CPU target: INT8 QDQ (static) or dynamic quantization, measured in queries per second."""
