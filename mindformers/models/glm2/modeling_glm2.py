"""ChatGLM2-6B: the LLaMA decoder (`models/llama/modeling_llama.py`) with q/k/v biases, 2 key/value groups and
RoPE on the first half of each head in interleaved pairs (all read from `ChatGLM2Config`), plus chat.

Parameter names are those of our LLaMA (HF `LlamaForCausalLM` style); `convert_glm2.py` maps the original
ChatGLM2 names and HF `GlmForCausalLM` names onto them."""
from mindformers.models.glm2.glm2_config import ChatGLM2Config
from mindformers.models.llama.modeling_llama import LlamaForCausalLM
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class ChatGLM2ForConditionalGeneration(LlamaForCausalLM):
    """ChatGLM2 causal LM (contracts of `CausalLMModel`); `chat` / `stream_chat` answer with the `[Round N]`
    prompt of `ChatGLM2Tokenizer.build_prompt`."""

    def __init__(self, config: ChatGLM2Config):
        super().__init__(config)

    def chat(self, tokenizer, query, history=None, **generate_kwargs):
        """(response, history + [(query, response)]) for one turn; `generate_kwargs` go to `generate` (the
        model config's generation defaults apply otherwise)."""
        history = list(history or [])
        ids = tokenizer.encode(tokenizer.build_prompt(query, history))
        output = self.generate([ids], **generate_kwargs)[0]
        response = tokenizer.decode(output[len(ids):], skip_special_tokens=True).strip()
        return response, history + [(query, response)]

    def stream_chat(self, tokenizer, query, history=None, timeout=None, **generate_kwargs):
        """Yield (response so far, history with this turn) as tokens arrive; the last item holds the full answer."""
        import threading
        from mindformers.generation import TextIteratorStreamer
        history = list(history or [])
        ids = tokenizer.encode(tokenizer.build_prompt(query, history))
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=timeout)
        errors = []

        def run():
            try:
                self.generate([ids], streamer=streamer, **generate_kwargs)
            except Exception as err:  # pylint: disable=broad-except
                errors.append(err)
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        response = ''
        for piece in streamer:
            response += piece
            yield response.strip(), history + [(query, response.strip())]
        worker.join()
        if errors:
            raise errors[0]
