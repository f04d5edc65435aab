//! The few classes every Tandem error falls into, chosen where the error is made, and the one
//! gRPC code each maps to.

/// What kind of failure an error is, from the caller's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The request itself is wrong; retrying it unchanged fails again.
    InvalidRequest,
    /// A limit or the cluster's capacity is reached now; retry later.
    Overloaded,
    /// No healthy worker can take the request.
    Unavailable,
    /// The request ran out of time.
    Timeout,
    /// The client went away.
    Cancelled,
    /// Something that exists was asked for and does not (a model, a transfer).
    NotFound,
    /// The target is not in a state that allows it (a worker still busy); fix that first.
    Precondition,
    /// The caller did not prove who it is (no API key, or a wrong one).
    Unauthenticated,
    /// A bug or a broken invariant; the client sees a generic message.
    Internal,
}

impl ErrorClass {
    pub fn code(self) -> tonic::Code {
        match self {
            Self::InvalidRequest => tonic::Code::InvalidArgument,
            Self::Overloaded => tonic::Code::ResourceExhausted,
            Self::Unavailable => tonic::Code::Unavailable,
            Self::Timeout => tonic::Code::DeadlineExceeded,
            Self::Cancelled => tonic::Code::Cancelled,
            Self::NotFound => tonic::Code::NotFound,
            Self::Precondition => tonic::Code::FailedPrecondition,
            Self::Unauthenticated => tonic::Code::Unauthenticated,
            Self::Internal => tonic::Code::Internal,
        }
    }

    /// A status for `message`; internal errors hide their details from the client.
    pub fn status(self, message: impl ToString) -> tonic::Status {
        match self {
            Self::Internal => tonic::Status::internal("internal error; see the server log"),
            _ => tonic::Status::new(self.code(), message.to_string()),
        }
    }
}
