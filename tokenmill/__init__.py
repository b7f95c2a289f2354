"""tokenmill: serve language models to many users at once on little hardware."""

from tokenmill.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str):
    # LLM pulls in torch; load it only when asked for, so `import tokenmill` stays light for the frontend.
    if name == "LLM":
        from tokenmill.entrypoints.llm import LLM

        return LLM
    raise AttributeError(name)
