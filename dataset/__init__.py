"""The competition data layer: safe readers, multimodal embeddings, semantic IDs, datasets and the demo world."""
from genrec.core.safeio import DataFormatError, UnsafePickleError, atomic_open, load_pickle, write_json

from .datasets import TestDataset, TrainDataset
from .files import CandidatePool, load_action_types, load_indexer, load_item_feats, load_labels, load_predict_set
from .mm_emb import MMEmbedding, load_feature, load_mm_emb
from .semantic_ids import (SEMANTIC_ID_FILE, CorruptSemanticIdFile, find_semantic_id_file, load_semantic_ids,
                           save_semantic_ids)
from .seqfile import SeqFile
from .store import FeatureSchema, ItemStore

__all__ = [
    "TestDataset", "TrainDataset", "CandidatePool", "load_action_types", "load_indexer", "load_item_feats",
    "load_labels", "load_predict_set", "MMEmbedding", "load_feature", "load_mm_emb", "DataFormatError",
    "UnsafePickleError", "atomic_open", "load_pickle", "write_json", "SEMANTIC_ID_FILE", "CorruptSemanticIdFile",
    "find_semantic_id_file", "load_semantic_ids", "save_semantic_ids", "SeqFile", "FeatureSchema", "ItemStore",
]
