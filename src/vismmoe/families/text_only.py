"""What every text-only family shares (`qwen3_moe`, `glm4_moe`): a flat config (no `text_config`), the decoder at
`model.model`, no vision tower. Images are refused with one line where they enter (a path, an image part of a chat
message); a message's text parts are joined into one string before the chat template runs (Qwen3's template renders
a message's content only when it is a string), so a message is tokenized as one string."""

from __future__ import annotations


class TextOnly:
    """Mixin for a text-only `Family`; put it first in the bases."""

    has_vision = False

    def text_config(self, config):
        return config

    def language_model(self, model):
        return model.model

    def expert_prefix(self, layer: int) -> str:
        return f"model.layers.{layer}.mlp.experts"

    def load_image_processor(self, model_dir: str):
        return None

    def random_image_processor(self, config):
        return None

    def tiny_image_processor(self, max_side: int = 224):
        return None

    def image_inputs(self, image_processor, images):
        self.check_images(len(images))
        return {}, []

    def synthetic_image_block(self, config, n_visual: int) -> list[int]:
        self.check_images()
        return []

    def _strings(self, messages: list[dict]) -> list[dict]:
        """`messages` with each message's text parts joined into one string content; UserError for an image part."""
        flat = []
        for m in messages:
            content = m["content"]
            if not isinstance(content, str):
                self.check_images(sum(p["type"] != "text" for p in content))
                content = "".join(p["text"] for p in content)
            flat.append({**m, "content": content})
        return flat

    def chat_ids(self, tokenizer, messages: list[dict], n_visual: list[int]) -> list[int]:
        """As `Family.chat_ids`, each message's text parts joined first (an image part: UserError)."""
        return super().chat_ids(tokenizer, self._strings(messages), n_visual)

    def chat_text(self, tokenizer, messages: list[dict]) -> str:
        """As `Family.chat_text`, with string contents."""
        return super().chat_text(tokenizer, self._strings(messages))

    def model_inputs(self, inputs: dict) -> dict:
        return {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
