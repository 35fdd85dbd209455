"""The offloading layer of the front process: ``cuda:0`` is a virtual device whose tensors live on
the job's workers (device.py, tensor.py, dispatch.py), reached through one job session
(session.py) that the ``torch.cuda`` facade and the import hook switch on."""
