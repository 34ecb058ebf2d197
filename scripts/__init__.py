"""Command-line scripts; a package so that ``scripts.gradio.dynamicrafter_pipeline`` imports."""
