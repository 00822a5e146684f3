"""The variant pipeline: from one FP32 ONNX model and its data, every variant a device may run,
each measured with the runtime its device would use."""
