"""What leaves placer for a trainer: the placement document (:mod:`.document`, schema in ``schemas/``), the loaders
that apply it to an ``nn.Module`` or build pipeline stages (:mod:`.loaders`), and timelines (:mod:`.timeline`)."""
