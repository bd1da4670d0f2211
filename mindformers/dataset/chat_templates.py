"""Prompt formats of the families' instruction and chat variants, as plain text (tokenizers add BOS/[gMASK]).

Each function returns the text the model sees before the answer; training data appends the answer (and EOS) after
it, and chat generation continues from it."""

LLAMA2_SYSTEM_OPEN, LLAMA2_SYSTEM_CLOSE = '<<SYS>>\n', '\n<</SYS>>\n\n'
LLAMA2_INST_OPEN, LLAMA2_INST_CLOSE = '[INST]', '[/INST]'

ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def alpaca_prompt(instruction, input_text=''):
    """The Stanford Alpaca prompt for one instruction (with its optional input)."""
    if input_text:
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def llama2_chat_turns(query, history=(), system=None):
    """LLaMA-2-chat prompt as a list of per-turn texts, one per `[INST] ... [/INST]` block: the past turns
    (`history` = [(user, assistant), ...]) end with their answers, the last one ends at `[/INST]`. Each turn is
    tokenized on its own with BOS (and past turns with EOS after the answer), as Meta's reference code does.
    `system` goes inside the first turn, wrapped in `<<SYS>>` markers."""
    turns = list(history) + [(query, None)]
    texts = []
    for index, (user, answer) in enumerate(turns):
        if index == 0 and system:
            user = f"{LLAMA2_SYSTEM_OPEN}{system}{LLAMA2_SYSTEM_CLOSE}{user}"
        text = f"{LLAMA2_INST_OPEN} {user.strip()} {LLAMA2_INST_CLOSE}"
        texts.append(text if answer is None else f"{text} {answer.strip()} ")
    return texts


def glm_chat_prompt(query, history=()):
    """ChatGLM-6B's (v1) chat prompt: the bare query without history; else `[Round i]` blocks numbered from 0 for
    the past turns (`history` = [(question, answer), ...]), then the query's block ending at `答：`."""
    if not history:
        return query
    prompt = ''
    for index, (question, answer) in enumerate(history):
        prompt += f"[Round {index}]\n问：{question}\n答：{answer}\n"
    return prompt + f"[Round {len(history)}]\n问：{query}\n答："


def glm2_chat_prompt(query, history=()):
    """ChatGLM2's `[Round N]` prompt: past turns (`history` = [(question, answer), ...]), then the query."""
    prompt = ''
    for index, (question, answer) in enumerate(history, start=1):
        prompt += f"[Round {index}]\n\n问：{question}\n\n答：{answer}\n\n"
    return prompt + f"[Round {len(history) + 1}]\n\n问：{query}\n\n答："
