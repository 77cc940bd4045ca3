"""Result stores: where task results live. Each implements ``aioqueue.results.base.ResultStore``."""
