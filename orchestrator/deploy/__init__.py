"""Getting winners onto devices and serving them: installs, stored deploys, Ray Serve, the tensor wire format. Imports spec, store and worker."""
