"""Synthetic, deterministic visual-question data (see :mod:`vismmoe.data.scenes`), made in parallel by
:mod:`vismmoe.data.workers`."""

from vismmoe.data.scenes import (
    AUX_QTYPES,
    IMAGE_SIZE,
    QTYPES,
    Sample,
    Scene,
    SceneObject,
    TextItem,
    answer_vocabulary,
    balanced_subset,
    content_tokens,
    make_sample,
    make_sample_and_scene,
    make_split,
    save_preview,
    warm_cache,
)
from vismmoe.data.workers import fork_pool

__all__ = [
    "AUX_QTYPES",
    "IMAGE_SIZE",
    "QTYPES",
    "Sample",
    "Scene",
    "SceneObject",
    "TextItem",
    "answer_vocabulary",
    "balanced_subset",
    "content_tokens",
    "fork_pool",
    "make_sample",
    "make_sample_and_scene",
    "make_split",
    "save_preview",
    "warm_cache",
]
