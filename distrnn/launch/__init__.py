"""Starting the processes of a job where no scheduler or horovodrun does: `python -m distrnn.launch --nproc N
-m distrnn.ptb ...` starts N workers on this machine, each with the TF_CONFIG that joins them through
TensorFlow's own collectives (local.py), passes signals on and never waits on a dead worker."""
