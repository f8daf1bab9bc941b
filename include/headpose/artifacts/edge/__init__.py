"""Edge formats of the frozen graph (ONNX, LiteRT, OpenVINO IR), each checked in its own runtime."""
