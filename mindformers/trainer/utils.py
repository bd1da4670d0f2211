"""Small helpers shared by the Trainer's parts."""
import inspect

__all__ = ['is_true', 'column_arguments']


def is_true(value):
    """A config switch: True, or the text 'true' in any case (CLI values arrive as text)."""
    return str(value).strip().lower() == 'true'


def column_arguments(network, columns):
    """Which dataset column feeds each argument of `network.construct` when the columns are named after its
    arguments: a list of column indexes, None where an argument keeps its default (attention_mask for an
    (input_ids, labels) dataset: MindFormers feeds columns positionally, but our models take labels third).
    None when some column is named otherwise: the columns are then passed in their order."""
    params = list(inspect.signature(network.construct).parameters)
    columns = list(columns)
    if not columns or any(c not in params for c in columns):
        return None
    return [columns.index(p) if p in columns else None for p in params[:max(map(params.index, columns)) + 1]]
