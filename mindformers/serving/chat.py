"""Chat messages (OpenAI's `[{role, content}]`) to the prompt ids a model continues, in its family's chat format.

Formats (`CHAT_FORMATS`):
- 'chatglm' (ChatGLM-6B, ChatGLM2-6B): the tokenizer's `build_prompt(query, history)` (`[Round N]` blocks), with the
  family's special tokens, as `model.chat` builds it; a system message is put before the first user message.
- 'llama2' (LLaMA-2-chat): Meta's `[INST] ... [/INST]` turns, the system message in `<<SYS>>` markers inside the first
  (the tokenizer's `encode_chat`).
- 'plain' (base models: GPT-2, PanGu-alpha, PengCheng.Mind, LLaMA): the system message and a blank line, then
  `User: <text>\\nAssistant: <text>\\n` per turn, ending with `User: <query>\\nAssistant:`. A base model may go on to
  write the next `User:` turn: send `stop: ["\\nUser:"]` to end the answer there.

A conversation is: optional system (or developer) messages first, then user and assistant messages alternating,
starting and ending with the user's. Anything else is refused (400 naming `messages`)."""
from mindformers.serving.protocol import bad_request

CHAT_FORMATS = ('chatglm', 'llama2', 'plain')
PLAIN_USER, PLAIN_ASSISTANT = 'User: ', 'Assistant:'


def resolve_chat_format(chat_format, tokenizer, source=''):
    """The format to use for `chat_format` ('auto' or one of CHAT_FORMATS) and the reason it was picked. 'auto':
    'chatglm' for a tokenizer with `build_prompt` (GLM, GLM2), 'llama2' for a tokenizer with `encode_chat` (LLaMA)
    when the model `source` (name or path) says 'chat', else 'plain'."""
    if chat_format != 'auto':
        if chat_format not in CHAT_FORMATS:
            raise ValueError(f"chat format {chat_format!r} is not one of auto, {', '.join(CHAT_FORMATS)}")
        needs = {'chatglm': 'build_prompt', 'llama2': 'encode_chat'}.get(chat_format)
        if needs and not hasattr(tokenizer, needs):
            raise ValueError(f"chat format {chat_format!r} needs a tokenizer with {needs}(); "
                             f"{type(tokenizer).__name__} has none")
        return chat_format, 'as asked'
    name = type(tokenizer).__name__
    if hasattr(tokenizer, 'build_prompt'):
        return 'chatglm', f"{name} has build_prompt"
    if hasattr(tokenizer, 'encode_chat') and 'chat' in str(source).lower():
        return 'llama2', f"{name} has encode_chat and {source} is a chat model"
    return 'plain', 'a base model'


def _content(message, index):
    content = message.get('content')
    if isinstance(content, list):  # content parts: only text ones
        if not all(isinstance(p, dict) and p.get('type') == 'text' and isinstance(p.get('text'), str)
                   for p in content):
            raise bad_request(f"messages[{index}].content: only text parts ({{\"type\": \"text\", \"text\": ...}}) "
                              f"are supported", 'messages')
        content = '\n'.join(p['text'] for p in content)
    if not isinstance(content, str):
        raise bad_request(f"messages[{index}].content must be a string, got {type(content).__name__}", 'messages')
    return content


def split_conversation(messages):
    """(system text or None, history [(user, assistant), ...], last user text) of an OpenAI `messages` list; an
    APIError 400 naming `messages` when it is not a conversation this server can continue."""
    if not isinstance(messages, list) or not messages:
        raise bad_request("`messages` must be a non-empty list of {role, content} objects", 'messages')
    system, turns = [], []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_request(f"messages[{index}] must be an object with role and content", 'messages')
        extra = sorted(set(message) - {'role', 'content'})
        if extra:
            raise bad_request(f"messages[{index}].{extra[0]} is not supported (only role and content)", 'messages')
        role, content = message.get('role'), _content(message, index)
        if role in ('system', 'developer'):
            if turns:
                raise bad_request(f"messages[{index}]: a {role} message must come before the conversation",
                                  'messages')
            system.append(content)
        elif role in ('user', 'assistant'):
            expected = 'user' if len(turns) % 2 == 0 else 'assistant'
            if role != expected:
                raise bad_request(f"messages[{index}] is from the {role}, expected the {expected}: user and "
                                  f"assistant messages must alternate, starting with the user", 'messages')
            turns.append(content)
        else:
            raise bad_request(f"messages[{index}].role {role!r} is not one of system, developer, user, assistant",
                              'messages')
    if len(turns) % 2 == 0:
        raise bad_request("the last message must be from the user" if turns else "`messages` holds no user message",
                          'messages')
    history = list(zip(turns[0:-1:2], turns[1::2]))
    return '\n\n'.join(system) or None, history, turns[-1]


def chat_prompt_ids(chat_format, tokenizer, messages):
    """The prompt ids for `messages` in `chat_format` (see the module doc)."""
    system, history, query = split_conversation(messages)
    if chat_format == 'llama2':
        return tokenizer.encode_chat(query, history, system)
    if chat_format == 'chatglm':
        if system:
            if history:
                history[0] = (f"{system}\n\n{history[0][0]}", history[0][1])
            else:
                query = f"{system}\n\n{query}"
        return tokenizer.encode_prompt(tokenizer.build_prompt(query, history))
    text = f"{system}\n\n" if system else ''
    for user, answer in history:
        text += f"{PLAIN_USER}{user}\n{PLAIN_ASSISTANT} {answer}\n"
    return tokenizer.encode_prompt(f"{text}{PLAIN_USER}{query}\n{PLAIN_ASSISTANT}")
