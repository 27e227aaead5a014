"""Placement policies (seq2seq, GNN, hierarchical) and their training algorithms."""
