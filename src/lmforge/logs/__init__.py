"""Reading, summarising and plotting `trainer_logs.json` files."""

from lmforge.logs.reader import TrainerLog, find_trainer_logs, read_trainer_log
from lmforge.logs.summary import RunSummary, format_summaries, summarize

__all__ = ["TrainerLog", "RunSummary", "find_trainer_logs", "read_trainer_log", "summarize", "format_summaries"]
