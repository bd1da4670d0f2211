"""`ChatMixin` lives with the models (`mindformers.models.chat`); this name stays for code that imported it here."""
from mindformers.models.chat import ChatMixin

__all__ = ['ChatMixin']
