# Lium template image for relay-trainer: slime's published image plus relay.py.
#   docker build -t USER/relay-trainer:0.3.0 . && docker push USER/relay-trainer:0.3.0
# then register USER/relay-trainer:0.3.0 as a Lium template (docs/slime.md, "Docker image").
# Pin the slime release you train with: --build-arg SLIME_IMAGE=slimerl/slime:<tag>
ARG SLIME_IMAGE=slimerl/slime:nightly-dev-20260804a-cu129
FROM ${SLIME_IMAGE}

# Lium runs every command over SSH: the image keeps an SSH server.  (The package version
# follows the base image's distribution, so it is not pinned here.)
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends openssh-server \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /run/sshd /root/.ssh \
 && chmod 700 /root/.ssh

# relay's packages go to /opt/relay/site, never into slime's Python (whose transformers pins
# huggingface_hub): see docker/install_relay.sh.
COPY docker/install_relay.sh /opt/relay/install_relay.sh
RUN PYTHON=python3 RELAY_DIR=/opt/relay bash /opt/relay/install_relay.sh

COPY relay.py launch_sft.sh launch_rl.sh slime_flags.txt /opt/relay/
COPY docker/entrypoint.sh /opt/relay/entrypoint.sh
RUN chmod 755 /opt/relay/launch_sft.sh /opt/relay/launch_rl.sh /opt/relay/entrypoint.sh

# A run config on the volume makes the container resume the relay whenever it starts.
ENV RELAY_CONFIG=/mnt/relay/run.yaml
ENTRYPOINT ["/opt/relay/entrypoint.sh"]
CMD ["/usr/sbin/sshd", "-D", "-e"]
