"""The bench stage: devices (host, Android over adb, iOS through xcodebuild), baseline runtimes, statistics,
and the versioned result (edgekd.bench/2)."""
