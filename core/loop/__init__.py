"""The training loop: set-up (``setup``, ``launch``), the optimizer step (``step``), logging
(``metrics``), checkpoints and resuming (``checkpoint``, ``resume``) and stopping
(``stopping``), run in that order by ``train``."""
