"""Running a job: what a job gives the loop (job.Job), its start-up (start.run), the one training loop
(loop), what every job's trainer is (trainer), the save path and its checkpoints (checkpoints), why a run
stops (stops), what it shows and writes (outputs), the one way a file is written (files), and the crash
points its tests kill it at (faults). Every job (distrnn.ptb, distrnn.mnist) plugs into this; nothing
here knows which job runs."""
