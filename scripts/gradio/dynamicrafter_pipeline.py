"""The usage guide's import path for the pipeline, which lives in :mod:`dynamicrafter.pipeline`.

    from scripts.gradio.dynamicrafter_pipeline import DynamiCrafterImg2VideoPipeline
"""

from dynamicrafter.pipeline import DynamiCrafterImg2VideoPipeline

__all__ = ["DynamiCrafterImg2VideoPipeline"]
