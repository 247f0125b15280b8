"""The training loop: set-up (``setup``, ``launch``; the splits' data, ``data``), the optimizer
step (``step``), logging (``metrics``), checkpoints and resuming (``checkpoint``, ``manifest``,
``resume``), stopping (``stopping``) and failing (``failures``), run in that order by ``train``;
what a run owns in its directory, and its lock (``rundir``); what it prints and its train.log
(``runlog``), the third-party messages it silences (``quiet``), and how it names what it trains
(``describe``)."""
