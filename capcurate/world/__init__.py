"""CapWorld: a small compositional world of shapes with true captions and web-like noisy alt-texts.

It is the offline stand-in for a web image-text pool (DESIGN.md section 4): ``capcurate synth``
renders it, and ``pipelines/quickstart.sh`` runs the whole curation pipeline on it.
"""
