//! `--stats FILE`: the per-second JSON figures and their writer.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{Error, Result, create_sink_file};
use crate::dedup::merge::{self};
use crate::output::{Lane, LaneSpec, Marker, Sink, Writer};

/// How often the status line and `--stats` are refreshed.
pub(super) const STATS_PERIOD: Duration = Duration::from_secs(1);

/// `--stats FILE`: one JSON object per line, written by its own writer thread so that a file that
/// is not read (a FIFO) never stalls the control loop; lines that do not fit are dropped.
pub(super) struct StatsFile {
    path: PathBuf,
    writer: Writer,
    lane: Lane,
}

/// Room for many seconds of figures even for large fleets (a line grows with the fleet).
const STATS_CAPACITY: usize = 8 << 20;

impl StatsFile {
    pub(super) fn create(path: &Path) -> Result<StatsFile> {
        let file = create_sink_file(path).map_err(|source| Error::StatsFile {
            path: path.display().to_string(),
            source,
        })?;
        let spec = LaneSpec {
            sink: Sink::File(file),
            capacity: STATS_CAPACITY,
            marker: Marker::Silent,
            name: format!("--stats {}", path.display()),
        };
        let (writer, mut lanes) = Writer::start("kvmerge-stats", vec![spec])
            .map_err(|e| Error::Control(format!("cannot start the --stats writer: {e}")))?;
        let lane = lanes
            .pop()
            .ok_or_else(|| Error::Control("no --stats lane".into()))?;
        Ok(StatsFile {
            path: path.to_path_buf(),
            writer,
            lane,
        })
    }

    pub(super) fn lane(&self) -> Lane {
        self.lane.clone()
    }

    /// Writes out what is queued until `deadline`; says what was lost.
    pub(super) fn finish(self, deadline: Instant) {
        let path = self.path.display();
        if !self
            .writer
            .finish(deadline.saturating_duration_since(Instant::now()))
        {
            log::warn!("--stats {path}: not written to the end (the file is not being read)");
        }
        let dropped = self.lane.dropped();
        if dropped > 0 {
            log::warn!(
                "--stats {path}: {dropped} bytes of figures dropped: the file was not being read"
            );
        }
    }
}

/// Queues one `--stats` line.
pub(super) fn write_stats(lane: &Lane, status: &merge::Status, last: bool) {
    #[derive(serde::Serialize)]
    struct Line<'a> {
        #[serde(rename = "final")]
        last: bool,
        #[serde(flatten)]
        status: &'a merge::Status,
    }
    match serde_json::to_vec(&Line { last, status }) {
        Ok(mut line) => {
            line.push(b'\n');
            lane.push(&line);
        }
        Err(e) => log::warn!("--stats: cannot encode the figures: {e}"),
    }
}
