"""moreh-docker-run: run a training program in a container of the platform's front image.

The container sees the current directory as its working directory and carries the user's token
and the master's address, so the platform's offloading layer (preinstalled in the image) sends
the program's cuda:0 work to the cluster.
"""
