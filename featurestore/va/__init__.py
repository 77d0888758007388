"""Valence-arousal (VA): per-modality VA scores cached beside the embeddings, and label VA."""
