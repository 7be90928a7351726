"""The retriever's model layer: the tree, the routers that rank leaves, and ``EHIModel``."""

from ehi.model.ehi_model import EHIModel
from ehi.model.leaf_sketch import LeafSketch
from ehi.model.router import Router
from ehi.model.tree import Tree
from ehi.results import Hit, Hits, UnknownIds

__all__ = ["EHIModel", "Hit", "Hits", "LeafSketch", "Router", "Tree", "UnknownIds"]
