//! The scoring service's clock: [`clm_platform::clock::Clock`], the system
//! clock unless `CLM_SCORING_CLOCK_FILE` names a file (testing only).

pub use clm_platform::clock::Clock;
