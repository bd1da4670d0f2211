"""Old path of `mindformers.dataset.chat_templates` (the families' prompt formats)."""
from mindformers.dataset.chat_templates import (alpaca_prompt, glm2_chat_prompt, glm_chat_prompt,  # noqa: F401
                                                llama2_chat_turns)
