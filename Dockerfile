FROM python:3.11-slim
WORKDIR /src
COPY . .
RUN pip install --no-cache-dir . && useradd --system tuxpilot
USER tuxpilot
ENTRYPOINT []
CMD ["tuxpilot", "up"]
