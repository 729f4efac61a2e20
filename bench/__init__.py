"""The front door: the `bench` command, the stage table, suites and their launchers, reports
and the environment report. It sits on top of every other package (benchmark's foundation,
encoders, weights, pretrain, transfer) and nothing imports it."""
