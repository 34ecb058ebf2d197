"""The Gradio demo and the pipeline's import path used by the usage guide."""
