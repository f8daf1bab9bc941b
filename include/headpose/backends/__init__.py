"""Training backends: the local stand-in for SageMaker and the code it ships."""
