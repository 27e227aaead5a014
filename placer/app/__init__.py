"""The application: training runs (:mod:`.train`), zero-shot placement (:mod:`.place`), ColocRL's comparison
table (:mod:`.compare`), the demo, run folders (:mod:`.runs`) and the command line (:mod:`.cli`)."""
