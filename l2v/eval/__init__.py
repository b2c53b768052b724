"""Evaluation: MTEB-style task types and metrics, an offline suite of real tasks, an mteb adapter, reports.

    >>> from l2v import Encoder
    >>> from l2v.eval import run_suite, list_tasks
    >>> results = run_suite(Encoder.from_pretrained())      # the whole offline suite, about a minute on CPU
    >>> results["tasks"]["wordnet-senses"]["main_score"]
"""

from .metrics import accuracy, average_precision, macro_f1, pearson, retrieval_metrics, spearman, v_measure
from .models import EmbeddingCache, SentenceTransformerModel, load_model, minilm_dir
from .suite import SUITE, get_task, list_tasks, run_suite, run_tasks, select_tasks
from .tasks import (
    ClassificationTask,
    ClusteringTask,
    PairClassificationTask,
    RerankingTask,
    RetrievalTask,
    STSTask,
    Task,
)

__all__ = [
    "SUITE",
    "ClassificationTask",
    "ClusteringTask",
    "EmbeddingCache",
    "PairClassificationTask",
    "RerankingTask",
    "RetrievalTask",
    "STSTask",
    "SentenceTransformerModel",
    "Task",
    "accuracy",
    "average_precision",
    "get_task",
    "list_tasks",
    "load_model",
    "macro_f1",
    "minilm_dir",
    "pearson",
    "retrieval_metrics",
    "run_suite",
    "run_tasks",
    "select_tasks",
    "spearman",
    "v_measure",
]
